"""Run payloads in a user process against a small stand-in hypervisor.

* :mod:`.toolchain` compiles C with Xen 4.17's exact x86 flags and links an image that stands in
  for ``xen-syms`` (same symbol naming, a build-id);
* :mod:`.loader` maps that image and does with a payload what Xen's loader does (spec §1-§3):
  move, relocate, check, patch with ``E9 rel32`` and revert;
* :mod:`.runner` drives the loader in a child process (a crash in patched code never takes the
  caller down) and compares behaviour before, after apply and after revert.

``xsbuild demo`` shows the whole pipeline with it; the test suite proves hundreds of payloads
with it.  Nothing here talks to a hypervisor.
"""

"""Test support: compile fixtures like Xen, build images and hand-made payloads, and prove a
payload's behaviour by loading it into a child process (see each module's docstring)."""

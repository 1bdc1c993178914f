/*
 * xsbuild demo: a tiny stand-in for Xen's common/version.c, compiled with the hypervisor's own
 * flags.  xen_check_vcpus() has the kind of bug an XSA fixes: it accepts a domain with zero
 * vCPUs.  fix.patch fixes it (and renames the version suffix, so the change is easy to see).
 */
#pragma GCC visibility push(hidden)  /* as Xen's compiler.h does for the whole hypervisor */

#define EINVAL 22
#define MAX_VIRT_CPUS 128

static unsigned int reads;  /* state the running hypervisor keeps across the patch */

const char *xen_extra_version(void)
{
    reads++;
    return "-demo";
}

unsigned int xen_extra_version_reads(void)
{
    return reads;
}

int xen_check_vcpus(unsigned int nr)
{
    if ( nr > MAX_VIRT_CPUS )
        return -EINVAL;
    return 0;
}

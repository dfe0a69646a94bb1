/*
 * Compiled once per output image with -DKILN_VARIANT="\"elf\"" (or pvh,
 * bzimage) by build.rs: the only C difference between the images.
 */
#include "boot.h"

#ifndef KILN_VARIANT
#error "build.rs defines KILN_VARIANT"
#endif

const char kiln_variant[] = KILN_VARIANT;

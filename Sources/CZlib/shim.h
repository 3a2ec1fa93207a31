// Lets Swift import the system's zlib through the CZlib module (see module.modulemap).
#include <zlib.h>

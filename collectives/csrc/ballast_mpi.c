/* Values that MPI defines as macros and bindgen cannot see. */
#include <mpi.h>

void *ballast_mpi_in_place(void) { return MPI_IN_PLACE; }

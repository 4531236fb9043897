//! Compiles a three-line C shim exposing `MPI_IN_PLACE` (a macro, so absent from the bindings)
//! when the `mpi` feature is on. Nothing is built otherwise.

fn main() {
    println!("cargo:rerun-if-changed=csrc/ballast_mpi.c");
    #[cfg(feature = "mpi")]
    build_shim();
}

#[cfg(feature = "mpi")]
fn build_shim() {
    let lib = match build_probe_mpi::probe() {
        Ok(lib) => lib,
        Err(errs) => {
            for e in errs {
                println!("cargo:warning=MPI probe: {e}");
            }
            panic!(
                "the `mpi` feature needs an MPI library: apt-get install -y libopenmpi-dev openmpi-bin \
                 (or MPICH with MPICC=mpicc.mpich)"
            );
        }
    };
    let mut build = cc::Build::new();
    build.file("csrc/ballast_mpi.c");
    if let Some(mpicc) = lib.mpicc {
        build.compiler(mpicc);
    } else {
        for inc in &lib.include_paths {
            build.include(inc);
        }
    }
    build.compile("ballast_mpi");
}

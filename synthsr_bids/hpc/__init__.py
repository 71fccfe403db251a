"""Scale-out helpers: job scripts for HPC schedulers (:mod:`synthsr_bids.hpc.slurm`:
one SLURM array task per participant, then a dependent group-level job).
Nothing here imports torch."""

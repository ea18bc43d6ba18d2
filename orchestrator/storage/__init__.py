"""Where things live: paths and URLs (`paths`), filesystems and object-store settings (`filesystems`), run
directories (`run_dirs`) and the checkpoint format (`checkpoints`)."""

"""The one-shot GPU check's stages (issue 23): run by ``benchmarks/gpu_check.sh``, one process
and one timeout per stage, each writing ``OUT/<stage>.json`` as it ends."""

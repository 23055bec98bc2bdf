import os

os.environ.setdefault("RECALIGN_QUIET", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

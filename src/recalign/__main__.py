"""`python -m recalign ...` = the `recalign` command (what `torchrun -m recalign` / `accelerate launch -m recalign`
start once per process)."""

from recalign.cli import main

if __name__ == "__main__":
    main()

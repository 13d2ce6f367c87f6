"""The recipe layer: stages, schedules, the trainer registry, finish (export + sample), sweeps."""

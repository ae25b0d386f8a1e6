"""What a run will need, from config.json alone: peak RAM and VRAM, disk, bytes moved, FLOPs, time.

One idea a file:
- geometry.py: a model's sizes (Geometry, vision_params), from config.json;
- memory.py: the memory model (Settings, estimate: RAM by run step under the step names COPY_OUTSIDE
  ... WRITE_AND_PROPAGATE, VRAM, disk, bytes moved, FLOPs) and the plan that fits this machine's limits
  (default_limits, fit, shared, largest_batch);
- probes.py: a device's rates, probed here (probe_rates, the disk's writes) or assumed from a GPU's
  data sheet (GPU_PEAK_TFLOPS, assumed_rates, local_rates);
- report.py: the time a plan takes at those rates (seconds), and its lines for the user (report);
- commands.py: what `streamprune plan` runs (plan_device, plan_model) and `plan --heal` (plan_heal).
- evaluation.py: `plan --tasks/--ppl`, a streamed `streamprune eval` (plan_eval: its buffer of every task's
  tokens, the layers and the final norm and LM head, TASK_SIZES).

Import from those files: the run path needs geometry, memory and report only; `streamprune plan` the rest.
"""

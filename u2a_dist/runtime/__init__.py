"""How ranks are started (docs/design.md §3): every path ends in ``u2a_dist.job.run_rank``.

- ``local``: W rank processes on this machine (``runtime.local.launch_local``).
- ``ray``: one Ray actor per rank in a placement group, restart from the last checkpoint on actor
  death (``runtime.ray.launch_ray``); embedded, an existing cluster, or ``ray job submit`` via
  ``launcher/ray_submit.py``. Imported lazily: importing ``ray`` costs seconds.
- ``deepspeed``: the ``deepspeed`` launcher runs ``launcher/ds_launch.py`` once per rank.
"""

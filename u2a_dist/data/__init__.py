"""Data (docs/design.md §4): read rows, turn them into records, tokenise them.

Imports run one way, so no module here needs another at call time to avoid a circle:
``readers`` (files and the hub) <- ``records`` (Completion, Pair, Prompt, shared checks)
<- ``completions`` (labelled model completions), ``builtin`` (the packaged demo set),
``trl_formats`` (TRL's dataset formats, files or an in-memory ``datasets.Dataset``)
<- ``examples`` (every schema and ``builtin:NAME`` into records) <- ``tokenize``.

This file also makes ``u2a_dist.data`` a regular package, which ``find_packages`` (and so a
wheel) needs in order to include it.
"""

"""LLaVA efficiency benchmark: vanilla vs the released VisionZip code's path vs ours (``python -m llava.bench``).

Modules: ``shapes`` (model shapes, ``--scale``, the random models), ``flops`` (exact FLOPs from shapes),
``measure`` (one request with stage clocks; interleaved medians; memory), ``methods`` (the rows of the methods that
prune inside the language model: their budgets and FLOPs inputs), ``report`` (ratios, goals, outputs), ``cli`` (the
command line).
"""

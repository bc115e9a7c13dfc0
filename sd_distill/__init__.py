"""sd-distill: distill Stable Diffusion's classifier-free guidance into a LoRA adapter.

``load_student(pipe, folder)`` loads a trained student into a stock ``StableDiffusionPipeline``;
``unload_student(pipe)`` takes it out again.
"""

__version__ = "0.1.0"


def load_student(pipe, folder, adapter_name=None):  # noqa: ANN001, ANN201 (a thin lazy re-export)
    """See :func:`sd_distill.conditioning.load_student` (imported lazily: ``import sd_distill`` stays light)."""
    from .conditioning import load_student as _load

    return _load(pipe, folder, adapter_name)


def unload_student(pipe):  # noqa: ANN001, ANN201 (a thin lazy re-export)
    """See :func:`sd_distill.conditioning.unload_student`."""
    from .conditioning import unload_student as _unload

    return _unload(pipe)

"""LayerSkip self-speculative decoding for vLLM.

Installing the package registers it with vLLM (entry point `vllm.general_plugins`); then

    LLM(model=CKPT, speculative_config={"method": "layerskip", "exit_layer": E,
                                        "num_speculative_tokens": K})

drafts K tokens with the model's own first E layers and verifies them with the rest.
"""

from .settings import SUPPORTED_ARCHITECTURES, LayerSkipConfigError, LayerSkipSettings

__all__ = ["SUPPORTED_ARCHITECTURES", "LayerSkipConfigError", "LayerSkipSettings", "register"]


def register() -> None:
    """vLLM general-plugin entry point: called once in every vLLM process."""
    from . import _vllm

    _vllm.install()

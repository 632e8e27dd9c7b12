"""Fine-tune or continually pretrain a local Hugging Face checkpoint with LayerSkip.

    python -m training.finetune --model DIR --data PATH... --output DIR --steps N [recipe flags]

Supported: LlamaForCausalLM and Qwen2ForCausalLM with safetensors weights. The default
preset is `continual-pretraining`; use `code-finetuning` or `task-finetuning` for the
paper's fine-tuning settings."""
from __future__ import annotations

import argparse

from .cli import run_cli
from .launch import run_training
from .models import check_model_dir, load_model
from .recipe import add_recipe_flags
from .trainer import add_training_flags


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR", help="local Llama/Qwen2 checkpoint")
    add_training_flags(p)
    p.add_argument("--seq-len", type=int, default=256, metavar="T")
    add_recipe_flags(p, default_preset="continual-pretraining")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    check_model_dir(args.model)  # fail before anything else on a bad --model

    def make_model(corpus, resume_from):
        # On resume the weights come from the checkpoint; the base model gives the
        # architecture and tokenizer.
        model, tokenizer = load_model(args.model)
        return model, tokenizer, {"mode": "finetune", "base_model": str(args.model)}

    run_training(args, make_model)


if __name__ == "__main__":
    run_cli(main)

"""LayerSkip training recipe for Hugging Face checkpoints: layer dropout, early-exit
loss and curricula (Elhoushi et al., 2024). Entry points: `python -m training.pretrain`,
`python -m training.finetune`, `python -m training.evaluate`; see training/README.md."""

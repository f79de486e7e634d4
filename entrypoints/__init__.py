"""Entry points: the `finetune` command. The top layer: it may import every layer below (README "Architecture")."""

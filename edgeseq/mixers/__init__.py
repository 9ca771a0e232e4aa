"""Mixers: the token-mixing layers families are made of, each once, with its state spec, its weight
conversion and its graph. A family is a layer pattern over these (mlx-lm's ssm.py serves five
families the same way)."""

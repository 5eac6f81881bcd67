"""The chat itself, with no I/O: parameters, prompts and their fitting, the turn's history rules,
reply shaping, detokenizing. Imports only the leaves (`errors`, `outcomes`, `log`)."""

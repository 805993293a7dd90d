"""The language-model side: rollouts of a transformers causal LM on the shared group-relative core."""

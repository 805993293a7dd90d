"""The shapes world: a procedural text-to-image domain (world), an exact detector and GenEval-style grading."""

"""Interactive SAM finetuning (the study's recipe)."""

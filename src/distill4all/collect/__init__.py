"""Stage `collect`: gather prompts from sources and have a teacher model answer them."""

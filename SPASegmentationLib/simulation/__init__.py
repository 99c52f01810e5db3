"""The simulated user of training, evaluation and the demo: preferences, first prompts, choices, clicks."""

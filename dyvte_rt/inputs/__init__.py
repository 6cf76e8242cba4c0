"""What a request brings: images (opened safely, preprocessed), prompts, question datasets."""

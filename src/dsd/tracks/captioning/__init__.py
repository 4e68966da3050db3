"""Captioning track: NeuralTalk on Flickr8k (Karpathy split), and its miniature on generated `scenes`."""

"""Speech track: Deep Speech 1 and 2 on LibriSpeech (or WSJ manifests), and their miniatures on `spoken`."""

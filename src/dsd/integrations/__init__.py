"""DSD as a callback of the usual training frameworks, each a thin shell around `dsd.DSD`.

    from dsd.integrations.lightning import DSDCallback        # pip install "dsd-training[lightning]"
    from dsd.integrations.huggingface import DSDTrainerCallback  # pip install "dsd-training[huggingface]"

The frameworks are optional: importing this package imports neither.
"""

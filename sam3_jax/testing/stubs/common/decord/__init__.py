def __getattr__(name):
    raise AttributeError(f"decord stub: decord.{name} is not available")

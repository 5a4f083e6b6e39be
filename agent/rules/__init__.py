"""Rules: model, loader, compiler, engine."""

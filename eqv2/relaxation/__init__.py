"""Batched structure relaxations (IS2RS / IS2RE): the engine, its optimizers, inputs, results and metrics."""

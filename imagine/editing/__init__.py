"""Instruction editing: `instructions` parses an edit instruction (pure text, no torch, so the HTTP ingress can use
it) and `grounding` turns it into per-frame masks with a text-conditioned detector + SAM2. Import the submodules;
this package imports nothing, so `import imagine.editing.instructions` stays light."""

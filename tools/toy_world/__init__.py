"""A toy world small enough to train an SD1-shaped model on a CPU (issue 24): procedurally drawn cartoon heads whose
identity and context are set by words, a reader that reads those attributes back from pictures, and the pieces of a
toy SD1 checkpoint. Pure numpy / PIL / torch: nothing here imports ComfyUI. See docs/toy-world.md."""

"""The paper's analysis tools (appendix A.3-A.5), as pictures and numbers a person looks at:
mask-slot statistics over a set of images, the D = 3 decoder feature coloured as RGB, and the
memory-to-pixel attention of the last dual-path transformer block (`max-deeplab analyze`)."""

"""Training-free context-window extension methods (PCW, GP, RP, PI, NTK, YaRN, SelfExtend)."""

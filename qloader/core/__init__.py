"""The bottom layer: errors, names, file IO and signals that every other layer shares. Imports no other layer."""

"""One module per method behind one interface (methods.base); the registry maps names to classes."""

# metrics part of the compiled core (see _core.pyx).

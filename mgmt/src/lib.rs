//! Management server: configuration map, epochs, config push (arrives with issue 4).

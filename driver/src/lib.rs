//! Client library and NBD frontend (arrives with issue 5).

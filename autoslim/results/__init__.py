"""The read side: a stored study as a table (``table``), a view (``view``), choices from it
(``selection``), its artifacts written out (``export``) and refined (``refinement``). It may
call the write side to replay a trial; the write side never imports it."""

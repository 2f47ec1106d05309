"""``report``: a markdown page with PNG plots from finished run folders: ``collect`` finds what
the stages wrote, ``plots`` draws it, ``markdown`` writes the page."""

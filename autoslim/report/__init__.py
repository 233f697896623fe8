"""The report: the data step (``data``), plotly figures (``figures``), text tables (``text``)
and the self-contained HTML file with its tables and images (``html``)."""

"""Pool format, synthetic pool, import, download, Ray scoring, reshard, runs and reports."""

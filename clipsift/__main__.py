from clipsift.cli import app

app(prog_name="clipsift")

"""``ckpt library serve``: a local web page over the library's index (a Flask app with
templates and a script shipped in the package, served by waitress; nothing is fetched from
outside the machine). ``app.create_app`` makes the app, ``server`` serves it,
``security`` decides who may ask, ``graph`` lays out the lineage drawing."""

"""The command lines :mod:`gateway.cli.fast` parses without click: GENERATED, do not edit.

Written by ``python -m gateway.cli.fast_spec`` from the click commands (those
with a ``runner``) and the root group's options; ``tests/unit/test_cli_fast.py``
fails when this file differs from what the click definitions give. JSON in a
string: parsed once by the fast path, left alone by the formatter.
"""

__all__ = ["TABLE_JSON"]

TABLE_JSON = """{
 "commands": {
  "inbox": {
   "arguments": [],
   "options": {
    "--gaps": {
     "choices": null,
     "dest": "gaps",
     "kind": "flag",
     "multiple": false,
     "path": null
    },
    "--home": {
     "choices": null,
     "dest": "app.home_option",
     "kind": "path",
     "multiple": false,
     "path": {
      "dir_okay": true,
      "executable": false,
      "exists": false,
      "file_okay": false,
      "readable": true,
      "writable": false
     }
    },
    "--json": {
     "choices": null,
     "dest": "app.as_json",
     "kind": "flag",
     "multiple": false,
     "path": null
    },
    "--suspect": {
     "choices": null,
     "dest": "suspect",
     "kind": "flag",
     "multiple": false,
     "path": null
    },
    "--type": {
     "choices": null,
     "dest": "case_type",
     "kind": "text",
     "multiple": false,
     "path": null
    }
   },
   "runner": "gateway.cli.exchange_client:inbox",
   "stop": [
    "--help",
    "-h"
   ]
  },
  "outbox": {
   "arguments": [],
   "options": {
    "--home": {
     "choices": null,
     "dest": "app.home_option",
     "kind": "path",
     "multiple": false,
     "path": {
      "dir_okay": true,
      "executable": false,
      "exists": false,
      "file_okay": false,
      "readable": true,
      "writable": false
     }
    },
    "--json": {
     "choices": null,
     "dest": "app.as_json",
     "kind": "flag",
     "multiple": false,
     "path": null
    },
    "--state": {
     "choices": [
      "queued",
      "delivered",
      "replaced"
     ],
     "dest": "state",
     "kind": "choice",
     "multiple": false,
     "path": null
    }
   },
   "runner": "gateway.cli.exchange_client:outbox",
   "stop": [
    "--help",
    "-h"
   ]
  },
  "send": {
   "arguments": [
    "case_type",
    "case_json"
   ],
   "options": {
    "--attach": {
     "choices": null,
     "dest": "attachments",
     "kind": "path",
     "multiple": true,
     "path": {
      "dir_okay": false,
      "executable": false,
      "exists": true,
      "file_okay": true,
      "readable": true,
      "writable": false
     }
    },
    "--home": {
     "choices": null,
     "dest": "app.home_option",
     "kind": "path",
     "multiple": false,
     "path": {
      "dir_okay": true,
      "executable": false,
      "exists": false,
      "file_okay": false,
      "readable": true,
      "writable": false
     }
    },
    "--json": {
     "choices": null,
     "dest": "app.as_json",
     "kind": "flag",
     "multiple": false,
     "path": null
    },
    "--public": {
     "choices": null,
     "dest": "public",
     "kind": "flag",
     "multiple": false,
     "path": null
    },
    "--reply-to": {
     "choices": null,
     "dest": "reply_to",
     "kind": "text",
     "multiple": false,
     "path": null
    }
   },
   "runner": "gateway.cli.exchange_client:send",
   "stop": [
    "--help",
    "-h"
   ]
  },
  "show": {
   "arguments": [
    "bundle_id"
   ],
   "options": {
    "--accept-suspect": {
     "choices": null,
     "dest": "accept_suspect",
     "kind": "flag",
     "multiple": false,
     "path": null
    },
    "--home": {
     "choices": null,
     "dest": "app.home_option",
     "kind": "path",
     "multiple": false,
     "path": {
      "dir_okay": true,
      "executable": false,
      "exists": false,
      "file_okay": false,
      "readable": true,
      "writable": false
     }
    },
    "--json": {
     "choices": null,
     "dest": "app.as_json",
     "kind": "flag",
     "multiple": false,
     "path": null
    },
    "--out": {
     "choices": null,
     "dest": "out_dir",
     "kind": "path",
     "multiple": false,
     "path": {
      "dir_okay": true,
      "executable": false,
      "exists": false,
      "file_okay": false,
      "readable": true,
      "writable": false
     }
    }
   },
   "runner": "gateway.cli.exchange_client:show",
   "stop": [
    "--help",
    "-h"
   ]
  }
 },
 "root": {
  "options": {
   "--api-url": {
    "choices": null,
    "dest": "app.api_url",
    "kind": "text",
    "multiple": false,
    "path": null
   },
   "--debug": {
    "choices": null,
    "dest": "app.debug",
    "kind": "flag",
    "multiple": false,
    "path": null
   },
   "--home": {
    "choices": null,
    "dest": "app.home_option",
    "kind": "path",
    "multiple": false,
    "path": {
     "dir_okay": true,
     "executable": false,
     "exists": false,
     "file_okay": false,
     "readable": true,
     "writable": false
    }
   },
   "--json": {
    "choices": null,
    "dest": "app.as_json",
    "kind": "flag",
    "multiple": false,
    "path": null
   },
   "--passphrase-file": {
    "choices": null,
    "dest": "app.passphrase_file",
    "kind": "path",
    "multiple": false,
    "path": {
     "dir_okay": false,
     "executable": false,
     "exists": false,
     "file_okay": true,
     "readable": true,
     "writable": false
    }
   },
   "--token-file": {
    "choices": null,
    "dest": "app.token_file",
    "kind": "path",
    "multiple": false,
    "path": {
     "dir_okay": false,
     "executable": false,
     "exists": false,
     "file_okay": true,
     "readable": true,
     "writable": false
    }
   },
   "--verbose": {
    "choices": null,
    "dest": "app.verbose",
    "kind": "flag",
    "multiple": false,
    "path": null
   },
   "-v": {
    "choices": null,
    "dest": "app.verbose",
    "kind": "flag",
    "multiple": false,
    "path": null
   }
  },
  "stop": [
   "--help",
   "--version",
   "-h"
  ]
 }
}
"""

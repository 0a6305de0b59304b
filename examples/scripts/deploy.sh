#!/bin/sh
# One run at a time (lock), output merged in order (combined), and a timeout.
# -- jojo --
# description: pretend to deploy a version; only one deploy runs at a time
# param: version - version to deploy
# required: version
# param: token - a secret; shown as FILTERED in job records
# filtered_params: token
# tags: ops
# lock: true
# output: combined
# timeout: 60
# -- jojo --
echo "deploying $VERSION"
echo "checking token (${#TOKEN} characters)" >&2
sleep 2
echo "deployed $VERSION"
echo "jojo_return_value version=$VERSION"

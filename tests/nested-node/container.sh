#!/bin/sh
# Runs in the container that containerd and runc make inside a privileged Husk container
# (node.sh): reports its root filesystem, its address on the nested bridge, its cgroup,
# whether it reaches the bridge's gateway, and the address the outside namespace saw it come from.
echo "nested-root-fs=$(awk '$2 == "/" { print $3 }' /proc/mounts)"
echo "nested-address=$(ip -4 addr show dev eth0 | awk '/inet / { print $2 }')"
echo "nested-cgroup=$(cut -d: -f3 /proc/self/cgroup)"
if ping -c 1 -W 10 10.99.0.1 >/dev/null 2>&1; then echo "nested-gateway=reached"; else echo "nested-gateway=unreached"; fi
# nc, not wget: busybox-static's wget looks up the service name through NSS, which a container
# without glibc's NSS libraries fails at.
echo "nested-outside-$(printf 'GET /cgi-bin/peer HTTP/1.0\r\n\r\n' | nc -w 20 192.0.2.2 8080 2>&1 | tail -n 1)"

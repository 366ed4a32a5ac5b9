#!/bin/sh
set -eu
busybox=${BUSYBOX:-/bin/busybox}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/tmp" "$root/www/cgi-bin"
cp "$busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
tar -C "$root" --exclude=./www -c . | docker import - gearproxy-example/db
printf '<h1>gearproxy example: web</h1>\n<a href="/cgi-bin/db">ask db</a>\n' >"$root/www/index.html"
cat >"$root/www/cgi-bin/db" <<'CGI'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
echo "ping from web" | nc 127.0.0.1 5432
CGI
chmod 755 "$root/www/cgi-bin/db"
tar -C "$root" -c . | docker import - gearproxy-example/web

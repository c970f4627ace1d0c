// A vSphere API simulator for blockferry's tests: govmomi's simulator (the library behind vcsim,
// from Debian's golang-github-vmware-govmomi-dev) with a vCenter model, served on loopback.
//
// Built by the `vcsim` fixture of tests/plugins/vsphere/conftest.py (GO111MODULE=off, GOPATH
// pointing at Debian's Go source tree). It prints the SDK URL on one line of standard output and
// serves until its standard input is closed (or it is terminated).
package main

import (
	"fmt"
	"io"
	"log"
	"net/url"
	"os"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	model := simulator.VPX()
	model.Machine = 3 // per host and per cluster resource pool: 6 VMs, one datastore
	defer model.Remove()
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	// a fixed login, so that a wrong password is refused as by a real vCenter
	model.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword("backup", "s3cret")}
	server := model.Service.NewServer()
	defer server.Close()
	fmt.Println(server.URL.String())
	_, _ = io.Copy(io.Discard, os.Stdin)
}
